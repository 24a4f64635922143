"""Ray Tune + Optuna studies: search spaces (`spaces`), the study driver (`study`), presets and
the command line of the scripts in studies/ (`presets`, `cli`), the Optuna journal (`journal`)."""
