"""The names of a study folder's parts that more than one layer reads or writes (see
`fgray.tune.study` for the whole layout): one place, so the Optuna journal, the report and
the study driver agree on them without importing one another."""

OPTUNA_JOURNAL = "optuna/journal.log"  # the Optuna studies (JournalStorage), STUDY_DIR-relative
