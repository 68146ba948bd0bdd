"""Pure code shared by the teacher service and the student worker: config, wire record, losses, data.

No module here starts Ray; the loss and wire-format modules import neither Ray nor transformers.
"""
