"""Input side of the trainer: sample schema, synthetic V*-like data, readers, TFDS builder, Grain pipeline.

Modules are imported explicitly by their users (no side-effect imports here):
  schema        the sample TypedDicts and field names
  synthetic     deterministic V*-like samples (one small target in a large cluttered image)
  readers       JSONL / V* Bench style / MME-RealWorld style readers, registered by SourceKind
  tfds_builder  ArrayRecord TFDS builder + TF-free random-access loading
  pipeline      Grain pipeline (shard, shuffle, guarded decode, list batches, checkpointable state)
"""
