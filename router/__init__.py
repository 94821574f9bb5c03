"""The router: the public gRPC API (SGLang scheduler service), batching, dispatch, transfer coordination."""
