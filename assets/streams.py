"""Dagster names of the streams: the one place an asset key is derived from a (surface, entity).

The per-stream facts (source, normalizer, table, clinical time) are in ``transforms.streams``;
this module adds only what belongs to the Dagster layer. Invariant: a stream's extract asset is
``fhir_<entity>`` or ``dm_<entity>``, and a table's load asset is the table's own name.
"""

from transforms.streams import Stream

_PREFIX = {"fhir": "fhir", "datamodel": "dm"}


def extract_asset(stream: Stream) -> str:
    """The extract asset that lands the stream's pages."""
    return f"{_PREFIX[stream.surface]}_{stream.entity}"
