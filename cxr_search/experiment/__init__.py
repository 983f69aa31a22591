"""The experiment: its plan and budget (`plan`, `budget`), its folder and lock (`folder`), its trials
(`trials`) and its results tables, ranking and predictions (`results`). No Ray."""
