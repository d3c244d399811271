//! `neox-worker`: serve a GPT-NeoX model, or run it offline (generate, logits, perplexity).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
