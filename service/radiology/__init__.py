"""Radiology results as DICOM objects (issue 18): Parametric Maps, Secondary Captures and TID
1500 Structured Reports written with highdicom from a source file's metadata and the maps
the engine computed. Torch-free: numpy, pydicom and highdicom only.

- :mod:`service.radiology.geometry`: the source's metadata in the shape highdicom reads
  (legacy multi-frame files get functional groups), and whether a parametric map can be
  placed on it at all.
- :mod:`service.radiology.objects`: the Parametric Map and Secondary Capture writers, and
  what every object shares (identity, equipment, label codes).
- :mod:`service.radiology.report`: the TID 1500 Structured Report.
"""
