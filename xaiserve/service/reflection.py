"""gRPC server reflection, v1 beside v1alpha, over every service of the port.

grpcio-reflection (up to 1.85 at least) implements only `grpc.reflection.v1alpha`, while grpcurl
and current clients ask for `grpc.reflection.v1` first. The two protocols are the same messages
with the same field numbers under another package name, so one servicer answers both: the
v1alpha one, registered a second time under the v1 service name (its messages parse and
serialise v1 requests byte for byte).

The descriptors it answers from are one pool built for it (`reflection_pool`): the default pool
holds explain.v1 and health, the Open Inference Protocol lives in a pool of its own (see
xaiserve.proto.inference), and the v1 reflection file is the v1alpha one under its v1 names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (V1, V1ALPHA)


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """The v1 reflection file: the v1alpha file under v1's file name, package and type names."""
    fp = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fp)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    fp.name, fp.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    fp.options.Clear()  # v1alpha's language options (java package, ...) are not v1's

    def rename(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for m in messages:
            for f in m.field:
                if f.type_name.startswith(old):
                    f.type_name = new + f.type_name[len(old) :]
            rename(m.nested_type)

    rename(fp.message_type)
    for s in fp.service:
        for m in s.method:
            m.input_type = new + m.input_type[len(old) :]
            m.output_type = new + m.output_type[len(old) :]
    return fp


def reflection_pool(files: Iterable[FileDescriptor]) -> descriptor_pool.DescriptorPool:
    """A pool with `files`, their dependencies, and both reflection files."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(fd: FileDescriptor) -> None:
        if fd.name in added:
            return
        for dep in fd.dependencies:
            add(dep)
        fp = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(fp)
        pool.Add(fp)
        added.add(fd.name)

    for fd in (*files, reflection_pb2.DESCRIPTOR):
        add(fd)
    pool.Add(_v1_file())
    return pool


def enable_reflection(server: Any, service_names: Iterable[str], files: Iterable[FileDescriptor]) -> None:
    """Serve reflection v1 and v1alpha on `server` (grpc.aio) for `service_names` (the reflection
    services are added), answering from `files` (the .proto files behind those services)."""
    names = tuple(dict.fromkeys([*service_names, *SERVICE_NAMES]))
    servicer = ReflectionServicer(names, pool=reflection_pool(files))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1, {"ServerReflectionInfo": v1}),))
