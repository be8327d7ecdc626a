"""The neutral layer of sparkgrid: what both sides of the network share.

`worker/` (the engine and its Ray actor) and `scheduler/` (the gRPC head and the ledger) never
import each other; each may import this package. It holds the typed worker contract
(`contract`), the cost table the router and the engine both read (`costs`), the home directory
(`home`), the command-line helpers (`options`), and the two places that join both sides: the
`sparkgrid` command (`cli`) and the one-machine stack (`stack`, `up_cli`). Only `cli`, `stack`
and `up_cli` import `worker` or `scheduler`, and only when a command needs them; the other
modules import neither (and no torch), so the scheduler's process stays free of the engine.
"""
