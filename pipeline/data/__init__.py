"""Images in: sources (class-folder trees, built-ins), the split, the decoder, decoded batches."""
