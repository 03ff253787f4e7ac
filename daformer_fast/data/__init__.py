"""Data: dataset file lists, image/label reading and the keep-ratio resize (`datasets.py`).

Submodules are imported explicitly (`from daformer_fast.data.datasets import list_samples`) so that importing this
package stays cheap and never pulls in an optional loader backend.
"""
