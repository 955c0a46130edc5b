//! Chat templates: a conversation (a list of `{role, content}` messages) rendered into the
//! prompt text a chat model was trained on, from the Jinja template its checkpoint carries
//! (`chat_template` in `tokenizer_config.json`, `tokenizer.chat_template` in a GGUF file), or
//! one of the templates known by name ([`ChatTemplate::named`]: `chatml`, `llama3`, `smollm2`)
//! for checkpoints that carry none.
//!
//! Rendering is set up as `transformers`' `apply_chat_template` sets up Jinja: blocks trimmed
//! and left-stripped, loop controls, Python's string and dict methods (`.strip()`,
//! `.items()`, …), `tojson`, `raise_exception(message)` (which becomes [`Error::Template`]
//! with the template's message), `strftime_now(format)`, and the variables `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token`. The test holds every rendering equal
//! to `transformers`' on the templates above (`testdata/chat/golden.json`).
//!
//! With a template, the rendered conversation is the prompt text; it is tokenised like any
//! prompt (no special tokens added: the template writes them), and the response follows it.

use crate::{Error, Result};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;
use std::path::Path;

/// ChatML (`<|im_start|>role\ncontent<|im_end|>\n`).
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Llama 3 Instruct's template.
pub const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// SmolLM2 Instruct's template, as its checkpoints carry it (ChatML with a default system
/// message).
pub const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// The message as a template value: a map with `role` and `content`.
    fn to_value(&self) -> minijinja::Value {
        let map: std::collections::BTreeMap<String, String> = [
            ("role".to_string(), self.role.clone()),
            ("content".to_string(), self.content.clone()),
        ]
        .into();
        minijinja::Value::from(map)
    }
}

/// A chat template with the special tokens it may write.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    /// Where it came from, for errors (a file, or `named:<name>`).
    pub origin: String,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// A template from its Jinja source.
    pub fn new(origin: &str, source: &str, bos_token: &str, eos_token: &str) -> Self {
        Self {
            origin: origin.to_string(),
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        }
    }

    /// A template known by name (`chatml`, `llama3`, `smollm2`), with its model family's
    /// special tokens.
    pub fn named(name: &str) -> Result<Self> {
        let (source, bos, eos) = match name {
            "chatml" => (CHATML, "<|im_start|>", "<|im_end|>"),
            "llama3" => (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
            "smollm2" => (SMOLLM2, "<|im_start|>", "<|im_end|>"),
            other => {
                return Err(Error::Template {
                    origin: format!("named:{other}"),
                    message: "no template of this name (chatml, llama3, smollm2)".into(),
                })
            }
        };
        Ok(Self::new(&format!("named:{name}"), source, bos, eos))
    }

    /// The template of a `tokenizer_config.json` (`chat_template`, a string, or the one named
    /// `default` of a list), with its `bos_token` and `eos_token`; `None` when it has none.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<Self>> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |message: String| Error::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("malformed JSON: {e}")))?;
        let source = match &v["chat_template"] {
            serde_json::Value::Null => return Ok(None),
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .ok_or_else(|| bad("key `chat_template`: no template named `default`".into()))?
                .to_string(),
            _ => return Err(bad("key `chat_template`: not a string or a list".into())),
        };
        // Special tokens are strings, or objects with a `content` field.
        let token = |key: &str| match &v[key] {
            serde_json::Value::String(s) => s.clone(),
            other => other["content"].as_str().unwrap_or_default().to_string(),
        };
        Ok(Some(Self::new(
            &path.display().to_string(),
            &source,
            &token("bos_token"),
            &token("eos_token"),
        )))
    }

    /// Renders a conversation; `add_generation_prompt` appends the opening of the assistant's
    /// turn. A syntax error, an undefined operation or the template's own `raise_exception`
    /// is [`Error::Template`] naming the template.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let fail = |e: minijinja::Error| Error::Template {
            origin: self.origin.clone(),
            message: match e.kind() {
                // The template's own message, as `transformers` raises it.
                ErrorKind::InvalidOperation => e.detail().unwrap_or_default().to_string(),
                _ => e.to_string(),
            },
        };
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(fail)?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_template("chat", &self.source).map_err(fail)?;
        let template = env.get_template("chat").map_err(fail)?;
        template
            .render(minijinja::context! {
                messages => messages.iter().map(Message::to_value).collect::<Vec<_>>(),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(fail)
    }
}

/// `strftime_now(format)`: the current UTC time formatted with `%Y`, `%m`, `%d`, `%b`, `%B`,
/// `%H`, `%M`, `%S` and `%%` (what chat templates use, e.g. Llama 3.1's `"%d %b %Y"`).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs, &format)
}

/// Formats Unix seconds (UTC) with the codes [`strftime_now`] knows.
fn format_utc(secs: u64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let name = MONTHS[(month - 1) as usize];
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn testdata() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/chat")
    }

    /// Every rendering (and every raised message) equal to `transformers`'.
    #[test]
    fn renderings_equal_transformers_apply_chat_template() -> Result<()> {
        let read = |name: &str| -> Value {
            let text = std::fs::read_to_string(testdata().join(name)).expect("read");
            serde_json::from_str(&text).expect("json")
        };
        let (templates, golden) = (read("templates.json"), read("golden.json"));
        let cases = golden["cases"].as_array().expect("cases");
        assert!(cases.len() >= 24);
        for case in cases {
            let name = case["template"].as_str().expect("name");
            let spec = &templates[name];
            let template = ChatTemplate::new(
                name,
                spec["template"].as_str().expect("template"),
                spec["bos_token"].as_str().expect("bos"),
                spec["eos_token"].as_str().expect("eos"),
            );
            let messages: Vec<Message> =
                serde_json::from_value(case["messages"].clone()).expect("messages");
            let gen = case["add_generation_prompt"].as_bool().expect("flag");
            match (template.render(&messages, gen), case["rendered"].as_str()) {
                (Ok(ours), Some(theirs)) => assert_eq!(ours, theirs, "{name}, {messages:?}"),
                (Err(Error::Template { message, .. }), None) => {
                    assert_eq!(message, case["error"].as_str().expect("error"), "{name}")
                }
                (ours, theirs) => panic!("{name}: ours {ours:?}, transformers {theirs:?}"),
            }
        }
        // The named templates are the ones the golden cases were rendered with.
        for name in ["chatml", "llama3", "smollm2"] {
            let named = ChatTemplate::named(name)?;
            assert_eq!(
                named.source,
                templates[name]["template"].as_str().unwrap_or("")
            );
        }
        Ok(())
    }

    #[test]
    fn syntax_errors_and_unknown_names_are_errors_naming_the_template() {
        let t = ChatTemplate::new("broken.json", "{% for m in messages %}", "", "");
        let err = t
            .render(&[], false)
            .expect_err("unclosed block")
            .to_string();
        assert!(err.contains("broken.json"), "{err}");
        let err = ChatTemplate::named("vicuna")
            .expect_err("unknown")
            .to_string();
        assert!(err.contains("vicuna") && err.contains("chatml"), "{err}");
    }

    #[test]
    fn dates_format_as_strftime_does() {
        // 2024-07-23 14:05:09 UTC.
        assert_eq!(format_utc(1_721_743_509, "%d %b %Y"), "23 Jul 2024");
        assert_eq!(
            format_utc(1_721_743_509, "%Y-%m-%d %H:%M:%S %B %%"),
            "2024-07-23 14:05:09 July %"
        );
        assert_eq!(format_utc(951_782_400, "%Y-%m-%d"), "2000-02-29");
    }
}
