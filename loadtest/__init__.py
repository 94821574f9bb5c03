"""`sparsepd loadtest`: concurrency sweeps against a running router (or one it launches), through the public
gRPC API only; per point the throughput, TTFT, TPOT, ITL, end-to-end latency, goodput, errors and the
router's transfer numbers, appended as JSONL and drawn as PNG charts. Definitions in `metrics.py`. A
multi-turn workload (`conversation.py`, `multiturn.py`) measures prefix caching turn by turn."""
