"""Ray Train around the engine's loop (`trainer`), the connection to Ray (`cluster`),
`fgray pretrain` (`launch`), and ending a Train run whose Tune trial was stopped
(`run_stop`). The per-epoch records they write live in the results layer
(`fgray.results.records`, no Ray)."""
