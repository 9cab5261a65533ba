"""Data: readers (DICOM series, NIfTI, PNG/JPEG), datalists and patient-grouped splits, modality presets, phantoms."""
