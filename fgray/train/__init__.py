"""Ray Train around the engine's loop (`trainer`), the connection to Ray (`cluster`) and
`fgray pretrain` (`launch`). The per-epoch records they write live in the results layer
(`fgray.results.records`, no Ray)."""
