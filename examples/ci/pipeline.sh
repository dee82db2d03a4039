#!/usr/bin/env bash
# An engine pipeline as a CI job would run it: plan -> compile (two variants of one recipe) -> quality gate
# -> pack + sign -> verify -> artifacts. The GitHub Actions workflow beside this file runs the same steps.
#
#   examples/ci/pipeline.sh RECIPE OUT_DIR [--set KEY=VALUE ...]
#
# RECIPE: the recipe to ship (e.g. recipes/demo.yaml). OUT_DIR receives artifacts/ (the signed archives,
# the public key and one JSON build summary per variant). Extra --set options apply to every variant
# (the test passes target.backend=eager to keep it short). The signing key comes from $SIGNING_KEY (a
# path; in CI a secret written to a file) or is made for this run. Exit codes are llmbuild's: 1 a
# failed build, 2 a bad recipe or option, 3 a variant that misses its quality gate.
set -euo pipefail

recipe=$1 out=$2
shift 2
llmbuild=${LLMBUILD:-llmbuild}
# name:overrides (space-separated): the demo model's MLP width (704) takes int4 groups of 64, not 128
variants=("int8:quantization.weights=int8" "int4:quantization.weights=int4 quantization.group_size=64")
memory=${PLAN_MEMORY:-8GiB}

mkdir -p "$out/engines" "$out/artifacts"
key=${SIGNING_KEY:-$out/signing-key}
if [ ! -f "$key" ]; then
  "$llmbuild" keygen -o "$key"
fi
cp "$key.pub" "$out/artifacts/"

for variant in "${variants[@]}"; do
  name=${variant%%:*} sets=()
  for override in ${variant#*:}; do sets+=(--set "$override"); done
  echo "== $name: plan"
  "$llmbuild" plan "$recipe" "${sets[@]}" "$@" --memory "$memory"
  echo "== $name: compile (the recipe's quality gate runs inside the build; a miss exits 3)"
  "$llmbuild" compile "$recipe" "${sets[@]}" "$@" -o "$out/engines/$name" --json > "$out/artifacts/$name.build.json"
  echo "== $name: pack and sign"
  "$llmbuild" pack "$out/engines/$name" -o "$out/artifacts/$name.tar.gz" --compress --sign-key "$key"
  echo "== $name: verify the artifact as a serving host would"
  "$llmbuild" verify "$out/artifacts/$name.tar.gz" --public-key "$key.pub"
done
echo "== artifacts"
ls -l "$out/artifacts"
