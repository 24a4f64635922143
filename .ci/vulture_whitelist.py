"""Names vulture (see [tool.vulture] in pyproject.toml) cannot see used: parameters that a
caller outside fgray passes by name. Only genuine false positives belong here."""

# torch.optim.Optimizer.step(closure=None): LARS keeps torch's signature.
closure  # noqa: B018, F821  (fgray/engine/optim.py)
# Ray Train's UserCallback.after_report(run_context, metrics, checkpoint), called by keyword.
run_context  # noqa: B018, F821  (fgray/train/trainer.py, RecordEpochs)
# Ray Tune's Callback hooks (on_trial_start, on_trial_result, ...) are called by keyword.
iteration  # noqa: B018, F821  (fgray/tune/study.py)
