"""`python -m llmbuild.cli ...`: the console script without installing it."""

from llmbuild.cli import main

if __name__ == "__main__":
    main()
