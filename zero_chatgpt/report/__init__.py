"""The report's building blocks: the document model rendered to Markdown and HTML (document) and the
plots (plots). The report stage is stages/report.py."""
