"""Triton kernels of the op library, for cuda engines: the same ops, references and rounding as the
C++ CPU kernels in ../csrc (each module mirrors a .cpp there).

Importing this package needs triton. Without a GPU, kernels run under the Triton interpreter
(`TRITON_INTERPRET=1`, set before triton is imported): that is how tests/plugins/triton/ checks
each kernel against its torch reference on CPU, on tiny shapes.
"""
