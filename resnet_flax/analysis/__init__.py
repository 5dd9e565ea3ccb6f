"""Analysis of run directories: loading, tables, figures, reports, layer statistics."""
