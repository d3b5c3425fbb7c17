"""Several nnU-Net raw datasets as one (M4oE): merging, the recorded per-case metadata, normalisation.

``nnunet-moe merge-datasets`` (``merge.merge_datasets``) writes the merged raw dataset; the metadata it
records in ``dataset.json`` is read back through ``metadata`` and new images are normalised for
prediction with ``normalisation.normalise_for_prediction``.
"""
