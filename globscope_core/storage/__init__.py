"""Storage and file formats: study.h5 and its row layout, atomic writes, VTK files, the names of a study's files.

Nothing is imported here: vtk_files and study_files run inside ParaView's own Python, which has no h5py or torch.
"""
