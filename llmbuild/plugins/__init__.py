"""The op library shared by builder and runtime (as TensorRT plugins are).

Model graphs call these ops by name (`torch.ops.llmbuild.<op>`); an engine's manifest records the
version of each op it was built against, and the runtime refuses an engine whose versions differ.
Importing this package registers every op.
"""

from __future__ import annotations

from llmbuild.plugins import paged_attention

OP_VERSIONS: dict[str, int] = {
    paged_attention.OP_NAME: paged_attention.VERSION,
}
