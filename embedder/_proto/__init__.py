"""Generated protobuf/gRPC stubs for ``embedder.v1`` (committed; see :mod:`embedder._proto.generate`)."""
