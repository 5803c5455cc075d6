"""Container health check: grpc.health.v1 Check against the local gateway; exit 0 only when SERVING.

Used by the Dockerfile's HEALTHCHECK (Kubernetes ignores it and runs its own gRPC probes, see the
Helm chart). It targets the plaintext health-only port when XAISERVE_HEALTH_PORT is set (the case
when the gRPC port is TLS-only, since this check carries no certificate), otherwise XAISERVE_PORT
(default 50051). `--service NAME` checks one service instead of the server as a whole.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_port = os.environ.get("XAISERVE_HEALTH_PORT") or os.environ.get("XAISERVE_PORT") or "50051"
    ap.add_argument("--address", default=f"127.0.0.1:{default_port}")
    ap.add_argument("--service", default="")
    ap.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args(argv)
    try:
        with grpc.insecure_channel(args.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as err:
        print(f"unhealthy: {args.address}: {err.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {args.address}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
