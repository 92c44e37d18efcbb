"""likerank's top layer: the command line, the report and the orchestration of the DAGs.

It imports the stages below it (``pipeline``, ``labeling``, ``training``, ``scoring``) and the
simulator; nothing below imports it.
"""
