"""Server settings: value spellings (values), kinds of values (kinds), the tree (settings), loading it."""
