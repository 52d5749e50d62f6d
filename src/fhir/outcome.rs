//! OperationOutcome: the one shape every error takes on the wire.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IssueSeverity {
    Fatal,
    Error,
    Warning,
    Information,
}

/// The subset of the IssueType value set (http://hl7.org/fhir/issue-type) this server emits.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum IssueType {
    Invalid,
    Structure,
    Required,
    Value,
    Invariant,
    Security,
    Login,
    Forbidden,
    NotFound,
    Deleted,
    TooLong,
    NotSupported,
    Duplicate,
    MultipleMatches,
    Conflict,
    Processing,
    Exception,
    TooCostly,
    Throttled,
    Timeout,
    Informational,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Issue {
    pub severity: IssueSeverity,
    pub code: IssueType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub expression: Vec<String>,
}

impl Issue {
    pub fn error(code: IssueType, diagnostics: impl Into<String>) -> Issue {
        Issue {
            severity: IssueSeverity::Error,
            code,
            diagnostics: Some(diagnostics.into()),
            expression: Vec::new(),
        }
    }
    pub fn warning(code: IssueType, diagnostics: impl Into<String>) -> Issue {
        Issue {
            severity: IssueSeverity::Warning,
            ..Issue::error(code, diagnostics)
        }
    }
    pub fn at(mut self, expression: impl Into<String>) -> Issue {
        self.expression.push(expression.into());
        self
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OperationOutcome {
    resource_type: &'static str,
    pub issue: Vec<Issue>,
}

impl OperationOutcome {
    pub fn new(issue: Vec<Issue>) -> Self {
        OperationOutcome {
            resource_type: "OperationOutcome",
            issue,
        }
    }
    pub fn single(issue: Issue) -> Self {
        Self::new(vec![issue])
    }
    pub fn information(text: impl Into<String>) -> Self {
        Self::single(Issue {
            severity: IssueSeverity::Information,
            code: IssueType::Informational,
            diagnostics: Some(text.into()),
            expression: Vec::new(),
        })
    }
}
