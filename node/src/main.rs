fn main() {
    std::process::exit(trellis_node::cli::main());
}
