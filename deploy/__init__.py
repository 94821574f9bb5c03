"""The deploy layer: the `sparsepd` command's subcommand table, `serve`, the launcher and the supervisor.

It sits above every role and imports each one only when its subcommand is chosen; nothing below imports it
(docs/DESIGN.md §2, tests/sparsepd/test_layout.py)."""
