"""Fine-tuning attacks, SLC-AUC, direct-use metrics and reports: how the product's promise is measured."""
