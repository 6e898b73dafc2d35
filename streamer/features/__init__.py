"""Features: the exact Kaldi filterbank AST was trained on, and the sliding windows over it."""
