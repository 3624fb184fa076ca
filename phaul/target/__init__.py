"""The target side: the agent that accepts authenticated sessions and restores migrated trees."""
