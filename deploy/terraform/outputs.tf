output "seeds" {
  description = "The peer addresses every agent joins through."
  value       = local.seeds
}

output "agents" {
  description = "Agent name => public address (the one it advertises to peers)."
  value       = merge(module.aws.agents, module.gcp.agents)
}
