"""What every pipeline stage uses: the stage entry point (cli), input errors, params.yaml
access, the array file formats (io) and the MVTec-layout dataset index (data).

One subpackage so that each stage's code deps in dvc.yaml name it once (DVC rewrites the whole
dvc.lock after every stage, so each dep entry costs every stage time)."""
