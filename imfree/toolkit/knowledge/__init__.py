"""Knowledge from an LLM: questions, providers, cache, runner, import, validation, clustering.

`run_knowledge` turns a label list into a label-set folder (classes, tree,
corpus) by asking an LLM (method.md, section 1); `import_sentences` reads
corpora published as `sentence#####label` lines; `validate_corpus` checks one.
"""

from imfree.toolkit.knowledge.importer import ImportSummary, import_sentences
from imfree.toolkit.knowledge.providers import ProviderConfig, ProviderError
from imfree.toolkit.knowledge.questions import TEMPLATE_VERSION, QuestionPlan, plan_questions
from imfree.toolkit.knowledge.runner import KnowledgeConfig, KnowledgeSummary, run_knowledge
from imfree.toolkit.knowledge.validation import ValidationReport, validate_corpus

__all__ = [
    "TEMPLATE_VERSION", "ImportSummary", "KnowledgeConfig", "KnowledgeSummary", "ProviderConfig",
    "ProviderError", "QuestionPlan", "ValidationReport", "import_sentences", "plan_questions",
    "run_knowledge", "validate_corpus",
]
