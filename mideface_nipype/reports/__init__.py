"""What a reader sees: skin renders, labelled slices and PNGs, the QA pictures and report.html."""
