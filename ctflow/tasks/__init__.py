"""Application tasks: problem set-up, DICOM series reconstruction, the demo, ``ctflow info``."""
