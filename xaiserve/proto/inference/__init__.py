"""The Open Inference Protocol v2 (protobuf package `inference`) and its generated stubs.

Its descriptors live in their own pool, `POOL`, not protobuf's default one: tritonclient, KServe
and others register their own copies of package `inference` in the default pool, and two files
defining one full name there refuse to load in the same process. xaiserve.service.protogen writes
the stubs against this pool.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
