"""The protobuf descriptor pool that holds kiln's KServe v2 messages.

Not protobuf's default pool: tritonclient (and other KServe v2 implementations) register the
same `inference.*` symbols there from their own files, and the default pool refuses duplicates.
See `server/proto/codegen.py` for how the generated stubs are pointed here.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
