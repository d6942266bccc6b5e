"""Storage and file formats: study.h5, atomic writes, VTK files, the names of a study's files."""
