"""DNSTap: Frame Streams collector and dnstap/DNS decoding."""
