"""Wire formats: the public gRPC API, worker control, and the P→D transfer frame schema."""
