"""Ray Train around the engine's loop (`trainer`), the connection to Ray (`cluster`), the
per-epoch records (`records`, no Ray) and `fgray pretrain` (`launch`)."""
