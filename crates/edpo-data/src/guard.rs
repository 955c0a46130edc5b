//! Panics inside third-party parsers turned into errors. The `tokenizers` crate `expect`s
//! inside its deserialiser (a damaged `decoder` section of a `tokenizer.json` panics), and
//! candle's GGUF reader trusts the shapes a file declares; a damaged file must be a named
//! error, never a crash. [`catch`] runs a closure and returns a panic in it as `Err(message)`,
//! without the panic's report on stderr (panics of other threads still print theirs).

use std::cell::Cell;
use std::sync::Once;

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`; a panic in it is `Err` with the panic's message.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    result.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_is_an_error_with_its_message_and_a_value_passes() {
        assert_eq!(super::catch(|| 3), Ok(3));
        let e = super::catch(|| -> u8 { panic!("damaged decoder") }).unwrap_err();
        assert_eq!(e, "damaged decoder");
    }
}
