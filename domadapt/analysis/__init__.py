"""Analysis of trained runs and sweeps: BIN gates, proxy A-distance, t-SNE, confusion.

Pure computations (arrays and models in, numbers out):
    gates.gate_summary(model) -> DataFrame        per BIN layer: mean rho, fractions, histogram
    adistance.proxy_a_distance(a, b) -> ADistance  d_A = 2 (1 - 2 err) of a linear domain probe
    features.extract_features(model, batches)      backbone / bottleneck features, logits, labels
    confusion.confusion_matrix / per_class_accuracy
    tsne.tsne_embedding(features)
Reports (run dirs in, CSV/JSON/PNG out), behind `domadapt gates | analyze | compare`:
    report.gates_report, report.analyze_report, report.compare_report
"""

from domadapt.analysis.adistance import ADistance, proxy_a_distance
from domadapt.analysis.confusion import confusion_matrix, per_class_accuracy
from domadapt.analysis.features import Features, extract_features
from domadapt.analysis.report import analyze_report, compare_report, gates_report
from domadapt.analysis.tsne import tsne_embedding
from domadapt.norms.gates import gate_summary, gate_totals, summarize_gates

__all__ = [
    "ADistance",
    "Features",
    "analyze_report",
    "compare_report",
    "confusion_matrix",
    "extract_features",
    "gate_summary",
    "gate_totals",
    "gates_report",
    "per_class_accuracy",
    "proxy_a_distance",
    "summarize_gates",
    "tsne_embedding",
]
