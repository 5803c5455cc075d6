"""The wire API (protobuf package explain.v1) and its generated stubs."""
