"""Stage drivers: one per command; they read a study, call the algorithms, write the study's files."""
