//! HF chat templates (Jinja) rendered with minijinja, for `qplc generate`.
use anyhow::{anyhow, Result};
use minijinja::{context, Environment, Error, ErrorKind};

/// Renders `template` for one user message, with the generation prompt appended, the way
/// `tokenizer.apply_chat_template([{"role": "user", ...}], add_generation_prompt=True)` does.
pub fn render_user_prompt(
    template: &str,
    prompt: &str,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    let mut env = Environment::new();
    // HF renders with trim_blocks and lstrip_blocks.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // Python string methods (`.strip()`, `.startswith()`) that HF templates call.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |_fmt: String| -> String {
        // Templates use the date only in system prompts; a fixed value keeps generation
        // reproducible.
        "28 Nov 2026".to_string()
    });
    env.add_template("chat", template)
        .map_err(|e| anyhow!("the chat template does not parse: {e}"))?;
    let tmpl = env.get_template("chat").expect("just added");
    tmpl.render(context! {
        messages => vec![context! { role => "user", content => prompt }],
        add_generation_prompt => true,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    })
    .map_err(|e| anyhow!("rendering the chat template failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_template_with_default_system_message() {
        let t = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let s = render_user_prompt(t, "Hi?", None, None).unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn bos_token_and_python_methods_are_available() {
        let t = "{{ bos_token }}{% for m in messages %}{{ m['content'].strip() }}{% endfor %}";
        let s = render_user_prompt(t, "  x  ", Some("<s>"), None).unwrap();
        assert_eq!(s, "<s>x");
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let t = "{{ raise_exception('only user/assistant roles') }}";
        let e = render_user_prompt(t, "x", None, None).unwrap_err();
        assert!(e.to_string().contains("only user/assistant roles"), "{e}");
    }

    #[test]
    fn strftime_now_renders_a_fixed_date() {
        let t = "{{ strftime_now('%d %b %Y') }}";
        assert_eq!(
            render_user_prompt(t, "x", None, None).unwrap(),
            "28 Nov 2026"
        );
    }

    #[test]
    fn a_template_that_does_not_parse_is_a_clear_error() {
        let e = render_user_prompt("{% for %}", "x", None, None).unwrap_err();
        assert!(e.to_string().contains("does not parse"), "{e}");
    }
}
