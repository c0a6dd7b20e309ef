"""Studies from the hospital's PACS: DICOMweb pull, a DICOM C-STORE listener, query by
PACS reference, and incremental publishing of new studies into a served index.

Needs the ``pacs`` extra (``pip install 'cohortsim[pacs]'``: dicomweb-client, pynetdicom);
every module imports those libraries lazily, so the rest of cohortsim works without them.
"""
