"""The Redox emulator: a real HTTP server with Redox's auth, FHIR R4 and Data Model surfaces, serving a
seeded synthetic population whose ground truth is known (docs/sandbox.md).

Invariant: nothing in this package imports the pipeline (pipelines, assets, resources, transforms,
schema); it stands in for a remote system and must stay swappable for the real one (import-linter
enforces it).
"""
