"""Running the stages into a workdir: orchestration, context, manifest, resume, files."""
